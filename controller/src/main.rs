//! `berth-controller`: see the crate docs; flags in `config.rs`.
use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let config = berth_controller::Config::parse();
    berth_runtime::logging::init(
        config.log_json,
        "info,kube=warn,aws_config=warn,aws_smithy_runtime=warn",
    );
    match berth_controller::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "berth-controller stopped");
            ExitCode::FAILURE
        }
    }
}
