//! Waiting for the cluster to reach a state, and on timeout a failure that shows why: the
//! last state the probe saw, the events of the objects involved and the recent log of the
//! processes involved.
//!
//! ```ignore
//! let dump = Diagnostics::new(&env).controllers(&controllers).events(&ns, "web");
//! let ips = wait_until("web gets an address", LONG, &dump, async || {
//!     let s = api.get("web").await.map_err(|e| e.to_string())?;
//!     Some(lb_ips(&s)).filter(|ips| !ips.is_empty()).ok_or(format!("status {:?}", s.status))
//! }).await;
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::controller::ControllerProc;
use crate::env::EnvInfo;
use crate::testing::TestEnv;

/// Lines of each log shown on a timeout.
pub const LOG_LINES: usize = 40;

/// What to show when a wait times out.
#[derive(Clone)]
pub struct Diagnostics {
    env: kube::Client,
    logs: Vec<(String, PathBuf)>,
    events: Vec<(String, String)>,
}

impl Diagnostics {
    pub fn new(env: &TestEnv) -> Self {
        Self {
            env: env.client.clone(),
            logs: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The tail of the log file `path`, headed `label`.
    pub fn log(mut self, label: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.logs.push((label.into(), path.into()));
        self
    }

    /// The log of every controller replica.
    pub fn controllers(self, controllers: &[ControllerProc]) -> Self {
        controllers.iter().fold(self, |d, c| {
            d.log(format!("controller {}", c.name), c.log.clone())
        })
    }

    /// The log of every node's agent (its current run, after restarts the newest).
    pub fn node_agents(self, info: &EnvInfo) -> Self {
        info.nodes.iter().fold(self, |d, n| {
            let node = &n.plan.name;
            let newest = (1..)
                .map(|g| info.log_dir.join(format!("nodeproxy-{node}.{g}.log")))
                .take_while(|p| p.exists())
                .last()
                .unwrap_or_else(|| info.log_dir.join(format!("nodeproxy-{node}.log")));
            d.log(format!("node agent {node}"), newest)
        })
    }

    /// The events of object `name` in `namespace`.
    pub fn events(mut self, namespace: &str, name: &str) -> Self {
        self.events.push((namespace.into(), name.into()));
        self
    }

    /// Everything collected, one section each.
    pub async fn report(&self) -> String {
        let mut out = Vec::new();
        for (ns, name) in &self.events {
            let events = crate::testing::events_in(&self.env, ns, name).await;
            let lines: Vec<String> = events
                .iter()
                .map(|(t, r, m)| format!("{t} {r}: {m}"))
                .collect();
            out.push(format!(
                "--- events of {ns}/{name} ---\n{}",
                lines.join("\n")
            ));
        }
        for (label, path) in &self.logs {
            out.push(format!(
                "--- {label} ({}) ---\n{}",
                path.display(),
                tail(path)
            ));
        }
        out.join("\n")
    }
}

fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(unreadable: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_LINES)..].join("\n")
}

/// Polls `probe` every 200 ms until it answers `Ok`, and returns that. After `timeout`
/// panics with `what`, the probe's last `Err` (the state it saw) and `dump`'s report.
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    dump: &Diagnostics,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(state) if Instant::now() >= deadline => panic!(
                "timed out after {}s waiting for {what}: {state}\n{}",
                timeout.as_secs(),
                dump.report().await
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// [`wait_until`] for a yes/no check.
pub async fn wait_true(
    what: &str,
    timeout: Duration,
    dump: &Diagnostics,
    mut check: impl AsyncFnMut() -> bool,
) {
    wait_until(what, timeout, dump, async || {
        if check().await {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await
}
