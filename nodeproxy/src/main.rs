//! `berth-nodeproxy`: see the library for what it does.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = berth_nodeproxy::Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot handle SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Rules stay programmed on exit: traffic keeps flowing until the next start. Pool
    // addresses are released so another node announces them at once.
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: releasing pool addresses and exiting, rules left in place"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: releasing pool addresses and exiting, rules left in place"),
        }
    };
    match berth_nodeproxy::run(args, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
