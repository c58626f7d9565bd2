//! The shutdown signal both binaries stop on.

use tokio::signal::unix::{SignalKind, signal};

/// Completes on SIGTERM or SIGINT, naming the signal. If the handlers cannot be
/// installed it never completes: the signals then keep their default action, which
/// ends the process.
pub async fn shutdown() -> &'static str {
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("cannot handle SIGTERM/SIGINT, they will end the process at once: {e}");
            std::future::pending().await
        }
    }
}
