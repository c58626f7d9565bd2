//! What the kernel-safety suites read of a node's agent and kernel: its `/healthz` (status
//! and body, from the host), nft inside the node's namespace, and its newest log.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::env::EnvInfo;
use crate::net::NodePlan;
use crate::nodeagent::ADMIN_PORT;

/// `/healthz` of the node's agent: (HTTP status, body); status 0 when nothing answered.
pub fn healthz(plan: &NodePlan) -> (u16, String) {
    let url = format!("http://{}:{ADMIN_PORT}/healthz", plan.ip);
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "2",
            "--noproxy",
            "*",
            "-w",
            "\n%{http_code}",
            &url,
        ])
        .stdin(Stdio::null())
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Runs a shell command line inside the node's namespace: (success, stdout + stderr).
pub fn sh_in(netns: &str, script: &str) -> (bool, String) {
    match Command::new("ip")
        .args(["netns", "exec", netns, "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, format!("ip netns exec {netns}: {e}")),
    }
}

/// The log of the node's agent as it runs now (the newest after restarts).
pub fn agent_log(info: &EnvInfo, node: &str) -> PathBuf {
    (1..)
        .map(|g| info.log_dir.join(format!("nodeproxy-{node}.{g}.log")))
        .take_while(|p| p.exists())
        .last()
        .unwrap_or_else(|| info.log_dir.join(format!("nodeproxy-{node}.log")))
}

/// How many lines of the node agent's current log contain `needle`.
pub fn log_lines(info: &EnvInfo, node: &str, needle: &str) -> usize {
    std::fs::read_to_string(agent_log(info, node))
        .map(|t| t.lines().filter(|l| l.contains(needle)).count())
        .unwrap_or(0)
}
