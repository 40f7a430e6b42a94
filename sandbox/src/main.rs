//! The `smd-sandbox` binary: serves the sandbox on its own, for CI pipelines and frontend teams.
//!
//! Prints `ready http://ADDR` on stdout once it accepts connections; logs go to stderr
//! (`RUST_LOG` filters them, default `info`). Ctrl-C (or SIGTERM) stops it gracefully, writing
//! the `--state` file a last time. A scenario or state file that cannot be used stops it before
//! it listens, with the reason on stderr and a non-zero exit.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use smd_sandbox::{SandboxConfig, SandboxOptions, Scenario, validate_clock_speed};
use tracing_subscriber::EnvFilter;

/// Emulators of the Argus and ReferralNet SMD providers and a payment gateway, for building and
/// testing against.
#[derive(Debug, Parser)]
#[command(name = "smd-sandbox", version)]
struct Arguments {
    /// Address to listen on.
    #[arg(long, env = "SMD_SANDBOX_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Seed for every random draw that should repeat between runs, such as decision times, and
    /// for the directory [default: the first scenario's seed, else 42].
    #[arg(long)]
    seed: Option<u64>,
    /// Sandbox seconds per real second for new namespaces' clocks.
    #[arg(long, default_value_t = 1.0, value_parser = parse_clock_speed, allow_negative_numbers = true)]
    clock_speed: f64,
    /// How many practitioners the generated directory holds (the five magic recipients included).
    #[arg(long, default_value_t = smd_sandbox::directory::DEFAULT_DIRECTORY_SIZE)]
    directory_size: usize,
    /// Push ReferralNet webhooks to loopback, private and link-local addresses too (a gateway
    /// on the same machine or network). Off by default: the sandbox then refuses such URLs.
    #[arg(long)]
    allow_private_webhooks: bool,
    /// Seed a namespace from a scenario file (TOML; see sandbox/scenarios/README.md). May be
    /// given once per namespace.
    #[arg(long = "scenario", value_name = "FILE")]
    scenarios: Vec<PathBuf>,
    /// Keep every namespace in this file across restarts: loaded at start if it exists, written
    /// atomically after changes and on shutdown.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
}

fn parse_clock_speed(text: &str) -> Result<f64, String> {
    let speed: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    validate_clock_speed(speed).map_err(|error| error.to_string())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let arguments = Arguments::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let mut scenarios = Vec::with_capacity(arguments.scenarios.len());
    for path in &arguments.scenarios {
        match Scenario::from_file(path) {
            Ok(scenario) => scenarios.push(scenario),
            Err(error) => {
                eprintln!("smd-sandbox: scenario {error}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let seed = arguments
        .seed
        .or_else(|| scenarios.iter().find_map(Scenario::seed))
        .unwrap_or(42);
    let config = SandboxConfig {
        seed,
        clock_speed: arguments.clock_speed,
        directory_size: arguments.directory_size,
        allow_private_webhooks: arguments.allow_private_webhooks,
    };
    let options = SandboxOptions {
        scenarios,
        state_file: arguments.state,
        save_interval: None,
    };
    let sandbox = match smd_sandbox::spawn_with(arguments.listen, config, options).await {
        Ok(sandbox) => sandbox,
        Err(error) => {
            eprintln!("smd-sandbox: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    println!("ready http://{}", sandbox.addr());

    stop_requested().await;
    tracing::info!("stopping");
    sandbox.shutdown().await;
    std::process::ExitCode::SUCCESS
}

/// Waits for Ctrl-C, or SIGTERM where there is one (container runtimes and CI send it).
async fn stop_requested() {
    let interrupted = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminated) => {
                tokio::select! {
                    () = interrupted => {}
                    _ = terminated.recv() => {}
                }
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                interrupted.await;
            }
        }
    }
    #[cfg(not(unix))]
    interrupted.await;
}
