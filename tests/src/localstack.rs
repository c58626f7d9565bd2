//! LocalStack in host mode from the pinned venv, with berth's ELBv2 extension.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::net::HOST_IP;
use crate::paths;
use crate::proc::{Supervised, free_port, wait_for};

pub struct LocalStack {
    pub endpoint: String,
    port: u16,
    process: Supervised,
}

impl LocalStack {
    /// Starts LocalStack at a free port, logging to `localstack.log`.
    pub async fn start(volume_dir: &Path, log_dir: &Path) -> Result<Self> {
        let port = free_port(&HOST_IP.to_string())?;
        Self::start_on(port, volume_dir, &log_dir.join("localstack.log")).await
    }

    /// Stops this LocalStack, losing all its state, and starts a fresh one at the same
    /// endpoint, logging to `log`.
    pub async fn restart(self, volume_dir: &Path, log: &Path) -> Result<Self> {
        let port = self.port;
        drop(self);
        let _ = std::fs::remove_dir_all(volume_dir);
        Self::start_on(port, volume_dir, log).await
    }

    async fn start_on(port: u16, volume_dir: &Path, log: &Path) -> Result<Self> {
        let python = paths::localstack_venv().join("bin").join("python");
        if !python.exists() {
            return Err(Error::Setup(format!(
                "{} is missing: run hack/setup-localstack.sh (make deps)",
                python.display()
            )));
        }
        let endpoint = format!("http://{HOST_IP}:{port}");
        std::fs::create_dir_all(volume_dir)
            .map_err(Error::io("create LocalStack volume", volume_dir))?;
        let mut cmd = Command::new(&python);
        cmd.args(["-m", "localstack.runtime.main"])
            .env("GATEWAY_LISTEN", format!("{HOST_IP}:{port}"))
            .env("SERVICES", "elbv2,ec2,iam")
            .env("LOCALSTACK_VOLUME_DIR", volume_dir)
            .env("LOCALSTACK_HOST", format!("{HOST_IP}:{port}"))
            .env("SKIP_SSL_CERT_DOWNLOAD", "1")
            .env("DISABLE_EVENTS", "1")
            .env("EAGER_SERVICE_LOADING", "1")
            .env("DNS_ADDRESS", "0")
            .env("PYTHONUNBUFFERED", "1");
        let process = Supervised::spawn("localstack", cmd, log)?;
        let health = format!("{endpoint}/_localstack/health");
        let http = reqwest::Client::new();
        wait_for(
            "LocalStack health with elbv2 and ec2",
            Duration::from_secs(120),
            || async {
                let Ok(resp) = http.get(&health).send().await else {
                    return false;
                };
                let Ok(body) = resp.json::<serde_json::Value>().await else {
                    return false;
                };
                ["elbv2", "ec2"]
                    .iter()
                    .all(|s| matches!(body["services"][s].as_str(), Some("available" | "running")))
            },
        )
        .await?;
        Ok(Self {
            endpoint,
            port,
            process,
        })
    }

    pub fn exited(&mut self) -> Option<String> {
        self.process.exited()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// AWS SDK configuration for LocalStack: fixed test credentials and region.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    let creds = aws_sdk_ec2::config::Credentials::new("test", "test", None, None, "berth-e2e");
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new(crate::net::REGION))
        .credentials_provider(creds)
        .load()
        .await
}
