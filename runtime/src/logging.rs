//! Logging setup both binaries share: `tracing` to stderr, plain or JSON, filtered by
//! `RUST_LOG` or else the binary's default.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset or
/// invalid (e.g. `"info,kube=warn"`).
pub fn init(json: bool, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
