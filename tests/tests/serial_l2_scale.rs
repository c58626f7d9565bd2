//! L2 announcement at scale (issue #17): 500 pool Services (≈170 addresses per node),
//! then 480 of them deleted at once, while the client requests the 20 kept addresses
//! without pause. Every node is healthy throughout, so no agent may lose a Lease and no
//! request may fail; every Lease of a deleted address is deleted. The renewal lateness
//! the agents measured is printed. Serial: it loads every agent and the apiserver.

use std::net::Ipv4Addr;

use berth_e2e::l2scale::{self, Scenario};
use berth_e2e::testing::TestEnv;

#[tokio::test]
async fn healthy_nodes_keep_every_lease_while_480_of_500_pool_services_go_at_once() {
    let env = TestEnv::connect().await;
    let scenario = Scenario {
        name: "l2-scale".into(),
        // A /23 of its own: 512 addresses, no other suite's.
        first: Ipv4Addr::new(198, 19, 32, 0),
        prefix_len: 23,
        services: 500,
        kept: 20,
    };
    let r = l2scale::run(&env, &scenario).await;
    let line = format!(
        "l2 scale: 500 addresses announced in {:.1}s; {} probes, {} failed; {} renewals, \
         lateness p50 <= {}s, p99 <= {}s; {} lost; 480 Leases deleted in {:.1}s\n",
        r.announce_all.as_secs_f64(),
        r.probes,
        r.failed_probes,
        r.renewals,
        r.lateness_p50,
        r.lateness_p99,
        r.lost,
        r.leases_gone.as_secs_f64()
    );
    // Also next to the environment's logs: a passing test's output is not shown.
    eprint!("{line}");
    let _ = std::fs::write(env.info.log_dir.join("l2-scale.txt"), &line);
    assert_eq!(
        r.lost,
        0.0,
        "healthy nodes lost Leases; the agents' last words on it:\n{}",
        lease_trouble(&env)
    );
    assert_eq!(r.failed_probes, 0, "requests to kept addresses failed");
    assert!(r.probes > 0, "no probe ran");
    assert!(r.renewals > 0.0, "no renewal was measured");
}

/// The agents' last log lines about Leases lost or renewed late (CI shows only the test's
/// output, not the logs).
fn lease_trouble(env: &TestEnv) -> String {
    let mut out = String::new();
    for node in &env.info.nodes {
        let log = env
            .info
            .log_dir
            .join(format!("nodeproxy-{}.log", node.plan.name));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let trouble: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("the Lease") && (l.contains("WARN") || l.contains("lost")))
            .collect();
        out.push_str(&format!("{}: {} lines\n", node.plan.name, trouble.len()));
        for l in trouble.iter().rev().take(8).rev() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}
