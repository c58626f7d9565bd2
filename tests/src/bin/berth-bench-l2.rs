//! `berth-bench-l2`: L2 announcement at 1,000 pool Services on the running local
//! environment (its node agents): time until every address is announced, renewal
//! lateness p50/p99, Leases lost by healthy nodes, failed probes while 980 Services are
//! deleted at once. Merges its `l2.*` keys into `target/bench/results.json`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::ExitCode;

use berth_e2e::l2scale::{self, Scenario};
use berth_e2e::testing::TestEnv;
use serde_json::{Value, json};

fn merge(results: &BTreeMap<String, Value>) -> std::io::Result<std::path::PathBuf> {
    let dir = berth_e2e::paths::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("results.json");
    let mut all: BTreeMap<String, Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    all.extend(results.clone());
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&all).unwrap_or_default() + "\n",
    )?;
    Ok(path)
}

#[tokio::main]
async fn main() -> ExitCode {
    let env = TestEnv::connect().await;
    let services = 1000;
    let scenario = Scenario {
        name: "bench-l2".into(),
        // A /22 of its own: 1,024 addresses.
        first: Ipv4Addr::new(198, 19, 36, 0),
        prefix_len: 22,
        services,
        kept: 20,
    };
    let r = l2scale::run(&env, &scenario).await;
    let results: BTreeMap<String, Value> = [
        ("l2.services", json!(services)),
        ("l2.announce_all_s", json!(r.announce_all.as_secs_f64())),
        ("l2.renewals", json!(r.renewals)),
        ("l2.renewal_lateness_p50_s", json!(r.lateness_p50)),
        ("l2.renewal_lateness_p99_s", json!(r.lateness_p99)),
        ("l2.lost_leases", json!(r.lost)),
        ("l2.probes", json!(r.probes)),
        ("l2.failed_probes", json!(r.failed_probes)),
        ("l2.leases_deleted_s", json!(r.leases_gone.as_secs_f64())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&results).unwrap_or_default()
    );
    match merge(&results) {
        Ok(p) => {
            eprintln!("merged into {}", p.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("writing results: {e}");
            ExitCode::FAILURE
        }
    }
}
