//! Failing transactions: another process replaces berth's `ip berth` table on one node
//! with one it owns (`flags owner`, held by a running `nft -i`), so every transaction of
//! the agent there is refused. The agent retries with backoff, its `/healthz` answers 503
//! with nft's error, the outage is logged once; when the owner exits (its table goes with
//! it) the next retry restores the rules and `/healthz` answers 200 again, with the
//! recovery logged once. Serial: the node drops Service traffic meanwhile. Needs root and
//! the running local cluster with its node agents (`make test`).

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use berth_e2e::agentstate::{healthz, log_lines, sh_in};
use berth_e2e::testing::TestEnv;
use berth_e2e::wait::{Diagnostics, wait_until};

const OUTAGE_LOG: &str = "sync failed, retrying with backoff";
const RECOVERY_LOG: &str = "sync recovered";

/// An `nft -i` session in a node's namespace owning table `ip berth`; its exit (on drop)
/// removes the table.
struct Owner(Child);

impl Owner {
    fn take(netns: &str) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "nft", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("nft -i in {netns}: {e}"));
        if let Some(stdin) = child.stdin.as_mut() {
            stdin
                .write_all(b"delete table ip berth; add table ip berth { flags owner; }\n")
                .expect("write to nft -i");
        }
        Self(child)
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_refused_transaction_fails_healthz_until_a_retry_succeeds() {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let node = &env.info.nodes[2].plan;
    let dump = Diagnostics::new(&env).node_agents(&env.info);
    let outages = log_lines(&env.info, &node.name, OUTAGE_LOG);
    let recoveries = log_lines(&env.info, &node.name, RECOVERY_LOG);
    let owner = Owner::take(&node.netns);
    let netns = node.netns.clone();
    wait_until(
        "a foreign owner of ip berth",
        Duration::from_secs(10),
        &dump,
        async || match sh_in(&netns, "nft list table ip berth") {
            (true, t) if t.contains("flags owner") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    let body = wait_until(
        "healthz 503 while syncs fail",
        Duration::from_secs(20),
        &dump,
        async || match healthz(node) {
            (503, b) if b.contains("consecutive syncs failed") => Ok(b),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert!(
        body.contains("Operation not permitted"),
        "nft's error: {body}"
    );
    // Several retries pass (1 s, 2 s, 4 s apart): still one outage in the log.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(healthz(node).0, 503);
    assert_eq!(log_lines(&env.info, &node.name, OUTAGE_LOG), outages + 1);
    drop(owner);
    wait_until(
        "healthz 200 after a retry succeeded",
        Duration::from_secs(60),
        &dump,
        async || match healthz(node) {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    let (listed, table) = sh_in(&node.netns, "nft list table ip berth");
    assert!(
        listed && table.contains("chain services"),
        "rules restored: {table}"
    );
    assert_eq!(log_lines(&env.info, &node.name, OUTAGE_LOG), outages + 1);
    assert_eq!(
        log_lines(&env.info, &node.name, RECOVERY_LOG),
        recoveries + 1
    );
}
