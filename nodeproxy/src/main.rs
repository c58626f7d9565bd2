//! `berth-nodeproxy`: see the library for what it does.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = berth_nodeproxy::Args::parse();
    berth_runtime::logging::init(args.log_json, "info,kube=warn");
    // Rules stay programmed on exit: traffic keeps flowing until the next start. Pool
    // addresses are released so another node announces them at once.
    let shutdown = async {
        let signal = berth_runtime::signal::shutdown().await;
        tracing::info!(
            signal,
            "releasing pool addresses and exiting, rules left in place"
        );
    };
    match berth_nodeproxy::run(args, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
