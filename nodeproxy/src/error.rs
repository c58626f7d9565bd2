//! The node agent's one error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Service, EndpointSlice, Node or flag value that cannot be used.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A command such as `ip addr` failed.
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// `nft -f -` refused a transaction.
    #[error("nft {mode} sync failed ({status}): {stderr}")]
    Nft {
        mode: &'static str,
        status: String,
        stderr: String,
    },
}

impl Error {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidInput(_) => "invalid_input",
            Error::Kube(_) => "kube",
            Error::Config(_) => "config",
            Error::Io { .. } => "io",
            Error::Command { .. } => "command",
            Error::Nft { .. } => "nft",
        }
    }
}
