//! Where the environment keeps binaries, state, logs and scratch files.

use std::path::PathBuf;

/// Root of the cargo workspace (the repository).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cache of built binaries and the LocalStack venv (outside the repo).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BERTH_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("berth")
}

/// Directory with the Kubernetes, etcd and helm binaries built by `hack/build-binaries.sh`.
pub fn bin_dir() -> PathBuf {
    cache_dir().join("bin").join("current")
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// The LocalStack venv made by `hack/setup-localstack.sh`.
pub fn localstack_venv() -> PathBuf {
    let version = read_version("LOCALSTACK_VERSION").unwrap_or_else(|| "4.14.0".into());
    cache_dir().join(format!("localstack-venv-{version}"))
}

/// A value from `hack/versions.env`.
pub fn read_version(key: &str) -> Option<String> {
    let text = std::fs::read_to_string(repo_root().join("hack/versions.env")).ok()?;
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
}

/// State of the running environment: env.json, kubeconfig, supervisor pid.
pub fn state_dir() -> PathBuf {
    std::env::var_os("BERTH_E2E_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join("e2e"))
}

/// One log file per process of the environment (`BERTH_E2E_LOG_DIR` overrides it, so
/// a second environment in one run keeps the first one's logs).
pub fn log_dir() -> PathBuf {
    std::env::var_os("BERTH_E2E_LOG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join("e2e-logs"))
}

/// Prefix of scratch directories (PKI, etcd data, LocalStack volume) in the temp dir.
pub const SCRATCH_PREFIX: &str = "berth-e2e-";

/// Binaries built next to the running one (berth-podserver, berth-nodeproxy, ...).
pub fn sibling_bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| repo_root().join("target").join("debug").join(name))
}
