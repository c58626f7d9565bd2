//! `berth-env`: the local environment's command line.
//!
//! - `up`: starts the environment in the background (a detached `serve`), waits until it
//!   is ready and prints how to use it.
//! - `serve`: runs the environment in the foreground until SIGTERM/SIGINT, then tears it
//!   down.
//! - `down`: stops a running environment and removes everything it made.
//! - `info`: prints the running environment's description (env.json).
//! - `restart-localstack`: has the supervisor replace LocalStack by a fresh one at the same
//!   endpoint (all AWS state lost) and recreate the VPC, subnets and instances with their
//!   old IDs (SIGUSR1 to the supervisor does the same).

use std::io::Write;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use berth_e2e::env::{self, Env, EnvInfo};
use berth_e2e::paths;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "berth's local cluster: control plane, LocalStack, simulated nodes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the environment in the background and wait until it is ready.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u8,
    },
    /// Run the environment in the foreground.
    Serve {
        #[arg(long, default_value_t = 3)]
        nodes: u8,
    },
    /// Stop the environment and clean up.
    Down,
    /// Print the running environment's description.
    Info,
    /// Restart LocalStack (losing its state) and recreate the VPC, subnets and instances.
    RestartLocalstack,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Up { nodes } => up(nodes),
        Cmd::Serve { nodes } => serve(nodes),
        Cmd::Down => {
            env::sweep();
            eprintln!("berth-env: stopped; namespaces, links, processes and scratch removed");
            ExitCode::SUCCESS
        }
        Cmd::RestartLocalstack => restart_localstack(),
        Cmd::Info => match EnvInfo::load() {
            Ok(info) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berth-env: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn restart_localstack() -> ExitCode {
    let result = EnvInfo::load().and_then(|info| {
        tokio::runtime::Runtime::new()
            .map_err(|e| berth_e2e::Error::Setup(format!("tokio runtime: {e}")))?
            .block_on(env::restart_localstack(&info))
    });
    match result {
        Ok(()) => {
            eprintln!("berth-env: LocalStack restarted; VPC, subnets and instances recreated");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth-env: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(nodes: u8) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth-env: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let state = paths::state_dir();
        let _ = std::fs::create_dir_all(&state);
        let env = match Env::start(nodes).await {
            Ok(env) => env,
            Err(e) => {
                eprintln!("berth-env: start failed: {e}");
                return ExitCode::FAILURE;
            }
        };
        let _ = std::fs::write(state.join("supervisor.pid"), std::process::id().to_string());
        let code = watch(env).await;
        let _ = std::fs::remove_file(state.join("supervisor.pid"));
        code
    })
}

/// Waits for a stop signal, reporting processes that die meanwhile; SIGUSR1 restarts
/// LocalStack.
async fn watch(mut env: Env) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut usr1)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
    ) else {
        eprintln!("berth-env: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut reported = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => {
                let outcome = env.restart_localstack().await;
                if let Err(e) = &outcome {
                    tracing::error!("LocalStack restart failed: {e}");
                }
                env::record_localstack_restart(env.localstack_restarts(), &outcome);
                reported.retain(|d: &String| !d.starts_with("localstack"));
            }
            _ = tick.tick() => {
                for d in env.dead() {
                    if reported.insert(d.clone()) {
                        tracing::error!("{d}");
                    }
                }
            }
        }
    }
    tracing::info!("stopping the local environment");
    env.stop().await;
    ExitCode::SUCCESS
}

fn up(nodes: u8) -> ExitCode {
    let log_dir = paths::log_dir();
    let state = paths::state_dir();
    let _ = std::fs::create_dir_all(&state);
    env::sweep();
    let log_path = state.join("berth-env.log");
    let log = match std::fs::File::create(&log_path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("berth-env: {}: {e}", log_path.display());
            return ExitCode::FAILURE;
        }
    };
    let Ok(exe) = std::env::current_exe() else {
        eprintln!("berth-env: cannot find own executable");
        return ExitCode::FAILURE;
    };
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--nodes", &nodes.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map(Stdio::from).unwrap_or(Stdio::null()))
        .stderr(Stdio::from(log));
    berth_e2e::proc::detach(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth-env: spawn supervisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprint!(
        "berth-env: starting the local environment (log: {})",
        log_path.display()
    );
    let start = Instant::now();
    let deadline = start + Duration::from_secs(300);
    loop {
        if EnvInfo::path().exists() && state.join("supervisor.pid").exists() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!(
                "\nberth-env: supervisor exited ({status}) before the environment was ready:"
            );
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            for line in text
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                eprintln!("  {line}");
            }
            eprintln!("process logs: {}", log_dir.display());
            return ExitCode::FAILURE;
        }
        if Instant::now() > deadline {
            eprintln!(
                "\nberth-env: not ready after 300 s; see {}",
                log_path.display()
            );
            env::sweep();
            return ExitCode::FAILURE;
        }
        eprint!(".");
        let _ = std::io::stderr().flush();
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(" ready in {:.1} s", start.elapsed().as_secs_f64());
    match EnvInfo::load() {
        Ok(info) => {
            print_summary(&info);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth-env: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_summary(info: &EnvInfo) {
    println!("Local cluster is up.");
    println!("  apiserver:   {}", info.apiserver_url);
    println!(
        "  LocalStack:  {} (region {})",
        info.localstack_endpoint, info.region
    );
    for n in &info.nodes {
        println!(
            "  node:        {} at {} (netns {}, pods {}, {})",
            n.plan.name, n.plan.ip, n.plan.netns, n.plan.pod_cidr, n.provider_id
        );
    }
    println!(
        "  client:      netns {} at {} (the outside world)",
        info.client_netns, info.client_ip
    );
    println!("  logs:        {}", info.log_dir.display());
    println!();
    println!("Use it:");
    println!(
        "  export KUBECONFIG={} PATH={}:$PATH",
        info.kubeconfig.display(),
        paths::bin_dir().display()
    );
    println!("  kubectl get nodes -o wide");
    println!(
        "  ip netns exec {} curl http://<node-ip>:<nodePort>/",
        info.client_netns
    );
    println!("Stop it: make down");
}
